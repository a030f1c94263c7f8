"""Voice service: text-to-speech and speech-to-text through chains of engines (DESIGN.md §7)."""
