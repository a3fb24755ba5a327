"""What machine a trial runs on: device resolution, environment capture, the allocator settings."""
