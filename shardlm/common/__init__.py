"""Plain data both processes share: the model's shape, the parallel layout, the typed step messages
and their wire encoding. Nothing here imports torch, the engine or the worker."""
