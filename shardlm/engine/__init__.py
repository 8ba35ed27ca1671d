"""The driver process: requests, tokenizer, scheduler, KV block table and output processing. It sends
each step to the workers as a `common.messages.StepPlan` and reads back a `StepResult`; it never
imports torch's model code (shardlm.worker)."""
