"""Code that runs inside one worker process (one per GPU rank)."""
