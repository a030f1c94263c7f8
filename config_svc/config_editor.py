"""The config's write side: seed, update by field mask, rollback; validation before every commit.

Plain domain code (no gRPC): the servicer awaits these calls one at a time (its write lock); the
store's round trips are awaited, never run on the event loop's thread. With several replicas on one
database the in-memory head may lag the table by a wake-up: the servicer catches up before a write,
and the store's compare-and-set refuses a write based on a stale head in any case.
A change equal to the head commits nothing (`unchanged`), so the history only holds real changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flynn.v1 import config_pb2
from google.protobuf import field_mask_pb2

from config_svc.revision_store import RevisionKind, RevisionStore, StaleHead, StoredRevision
from config_svc.validation import validate_config, validate_mask
from flynn_runtime import config_yaml
from flynn_runtime.errors import FieldViolation, FlynnError, failed_precondition, invalid_fields, not_found

KIND_SEED = config_pb2.CONFIG_REVISION_KIND_SEED
KIND_UPDATE = config_pb2.CONFIG_REVISION_KIND_UPDATE
KIND_ROLLBACK = config_pb2.CONFIG_REVISION_KIND_ROLLBACK
MAX_REASON = 1024


@dataclass
class ChangeResult:
    revision: int
    config: config_pb2.FlynnConfig
    diff: list[tuple[str, str, str]] = field(default_factory=list)
    committed: StoredRevision | None = None
    dry_run: bool = False
    unchanged: bool = False


class ConfigEditor:
    def __init__(self, store: RevisionStore) -> None:
        self.store = store
        self._head_rev = 0
        self._head_cfg = config_pb2.FlynnConfig()

    async def load(self) -> None:
        """Read the head revision from the store (at start-up)."""
        head = await self.store.head()
        if head:
            stored = await self.store.get(head)
            assert stored is not None
            self._head_rev, self._head_cfg = head, _parse(stored.config)

    def adopt(self, s: StoredRevision) -> None:
        """Take `s` as the head when it is newer (a revision committed here or through another replica)."""
        if s.revision > self._head_rev:
            self._head_rev, self._head_cfg = s.revision, _parse(s.config)

    @property
    def head_revision(self) -> int:
        return self._head_rev

    @property
    def head_config(self) -> config_pb2.FlynnConfig:
        return self._head_cfg

    async def seed_if_empty(
        self, cfg: config_pb2.FlynnConfig, actor: str, reason: str
    ) -> StoredRevision | None:
        """Commit `cfg` as revision 1 when the history is empty; refuses an invalid seed."""
        if self._head_rev:
            return None
        problems = validate_config(cfg)
        if problems:
            raise invalid_fields(problems, reason="INVALID_SEED")
        diff = config_yaml.diff(config_pb2.FlynnConfig(), cfg)
        try:
            stored = await self.store.append(
                KIND_SEED, actor, reason, diff, cfg.SerializeToString(), expected_head=0
            )
        except StaleHead:
            # Another process sharing the database seeded first: take its history as it is.
            await self.load()
            return None
        if stored.revision > self._head_rev:
            self._head_rev, self._head_cfg = stored.revision, cfg
        return stored

    async def revision(self, revision: int) -> tuple[StoredRevision, config_pb2.FlynnConfig]:
        rev = revision or self._head_rev
        stored = await self.store.get(rev)
        if stored is None:
            raise not_found("revision", str(revision), reason="REVISION_NOT_FOUND")
        return stored, _parse(stored.config)

    async def update(
        self,
        partial: config_pb2.FlynnConfig,
        paths: list[str],
        expected_revision: int,
        reason: str,
        actor: str,
        dry_run: bool = False,
    ) -> ChangeResult:
        problems = validate_mask(paths)
        if expected_revision <= 0:
            problems.append(
                FieldViolation("expected_revision", "is required: pass the head revision you read")
            )
        if len(reason) > MAX_REASON:
            problems.append(FieldViolation("reason", f"at most {MAX_REASON} characters"))
        # Merge the valid paths and validate the result too, so one answer names every problem.
        good = [p for p in paths if not any(v.field.startswith("update_mask") for v in validate_mask([p]))]
        merged = config_pb2.FlynnConfig()
        merged.CopyFrom(self._head_cfg)
        if good:
            mask = field_mask_pb2.FieldMask(paths=good)
            mask.MergeMessage(
                _with_parents(partial, good), merged, replace_message_field=True, replace_repeated_field=True
            )
        problems.extend(validate_config(merged))
        if problems:
            raise invalid_config(problems)
        self._check_fresh(expected_revision)
        return await self._commit(merged, KIND_UPDATE, reason, actor, dry_run, expected_revision)

    async def rollback(
        self, to_revision: int, expected_revision: int, reason: str, actor: str, dry_run: bool = False
    ) -> ChangeResult:
        if to_revision <= 0:
            raise invalid_fields(
                [FieldViolation("to_revision", "is required (a revision from ListRevisions)")]
            )
        if expected_revision:
            self._check_fresh(expected_revision)
        stored = await self.store.get(to_revision)
        if stored is None:
            raise not_found("revision", str(to_revision), reason="REVISION_NOT_FOUND")
        target = _parse(stored.config)
        return await self._commit(
            target, KIND_ROLLBACK, reason, actor, dry_run, expected_revision or None, to_revision
        )

    def _check_fresh(self, expected_revision: int) -> None:
        if expected_revision != self._head_rev:
            raise _stale(expected_revision, self._head_rev)

    async def _commit(
        self,
        new: config_pb2.FlynnConfig,
        kind: RevisionKind,
        reason: str,
        actor: str,
        dry_run: bool,
        expected: int | None,
        restored: int = 0,
    ) -> ChangeResult:
        problems = validate_config(new)
        if problems:
            raise invalid_config(problems)
        diff = config_yaml.diff(self._head_cfg, new)
        if not diff:
            return ChangeResult(self._head_rev, self._head_cfg, [], None, dry_run, unchanged=True)
        if dry_run:
            return ChangeResult(self._head_rev, new, diff, None, True)
        try:
            stored = await self.store.append(
                kind,
                actor,
                reason,
                diff,
                new.SerializeToString(),
                restored_revision=restored,
                expected_head=expected if expected is not None else self._head_rev,
            )
        except StaleHead as e:
            raise _stale(expected or self._head_rev, e.head) from None
        if stored.revision > self._head_rev:  # another replica's newer revision may already be adopted
            self._head_rev, self._head_cfg = stored.revision, new
        return ChangeResult(stored.revision, new, diff, stored)


def _with_parents(partial: config_pb2.FlynnConfig, paths: list[str]) -> config_pb2.FlynnConfig:
    """A copy of `partial` where every message on a mask path is present.

    FieldMask.MergeMessage skips a path whose parent message is unset in the source, so a path left
    empty in the request (meaning "clear this", AIP-134) would silently keep its old value.
    """
    out = config_pb2.FlynnConfig()
    out.CopyFrom(partial)
    for path in paths:
        node: Any = out
        for part in path.split(".")[:-1]:
            node = getattr(node, part)
            node.SetInParent()
    return out


def invalid_config(problems: list[FieldViolation]) -> FlynnError:
    """A config that does not validate: INVALID_ARGUMENT with reason INVALID_FIELD like every other bad
    request. Its ErrorInfo metadata keeps `legacy_reason: INVALID_CONFIG`, the reason this answer
    carried before, for clients that branch on it (docs/api/PROTOCOL.md, "Reasons")."""
    err = invalid_fields(problems)
    err.metadata = {**err.metadata, "legacy_reason": "INVALID_CONFIG"}
    return err


def _stale(expected: int, head: int) -> Exception:
    return failed_precondition(
        f"the config changed since revision {expected}; the head is {head}: re-read and retry",
        reason="STALE_REVISION",
        current_revision=str(head),
        expected_revision=str(expected),
    )


def _parse(blob: bytes) -> config_pb2.FlynnConfig:
    cfg = config_pb2.FlynnConfig()
    cfg.ParseFromString(blob)
    return cfg
