"""Run control: sessions, message ledger, runs, run events and the reply outbox (DESIGN.md §4)."""
