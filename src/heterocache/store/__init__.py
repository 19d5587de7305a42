"""Storage: one layer's keys and values packed per (batch row, KV head), each with its own length."""
