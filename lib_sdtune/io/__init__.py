"""File I/O: streaming safetensors read/write (atomic), hashes, checkpoint sources, architecture detection."""
