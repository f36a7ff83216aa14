"""Training loops. ``common`` holds what every loop shares (EMA, device and precision,
progress bars, JSONL logs, the deterministic batch order); ``teacher`` trains a PFGM++
teacher."""
