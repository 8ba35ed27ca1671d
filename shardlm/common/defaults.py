"""Engine defaults that the torch-free planner models too (EngineArgs takes its defaults from here)."""

MAX_NUM_SEQS = 256
"""most sequences in one step (EngineArgs.max_num_seqs): also the largest decode graph's batch"""
MAX_SEQ_LEN_TO_CAPTURE = 8192
"""longest context a decode graph gathers on the torch attention path (EngineArgs.max_seq_len_to_capture's
default there; with the attention kernels the default is max_model_len)"""
