"""The megatron-core model: builder (GPTModel per pipeline stage), attention, norm, batches.

from remote_runtime.model.builder import ModelOptions, build_model
from remote_runtime.model.forward import pack_documents, packed_seq_params, forward_logits
"""
