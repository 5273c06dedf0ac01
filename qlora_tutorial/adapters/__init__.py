"""Keep, share and fold in what fine-tuning learned: the adapter modules, one job each.

* ``ours``: our own format, ``save_adapter(model, folder)`` / ``load_adapter(model, folder)``: the
  LoRA matrices (and DoRA's magnitudes) and a small JSON config, bit-exact, every key and shape
  checked on the way in.
* ``peft_format``: ``export_peft(model, folder)`` writes what ``peft.PeftModel.from_pretrained(base,
  folder)`` runs on the plain base model; ``import_peft(model, folder, use_qlora=...)`` loads a PEFT
  LoRA adapter from anywhere, and every config field we cannot honour is an error naming the field.
* ``merge``: ``merge(model)`` folds ``W0 + s * (W_a @ W_b)^T`` into plain layers (or, with
  ``requantize=True``, into 4-bit ones again); ``merge_errors`` measures what each way of storing
  the merged weight costs.
* ``checkpoint``: ``save_quantized(model, folder)`` / ``load_quantized(model_or_config, folder)``,
  the whole quantized model, base included, bit-exact.
* ``folder``: the one writer and the one reader of the folders all of them use (a JSON config and a
  safetensors file: tensors and JSON only, never pickled Python objects).

Every loader checks what it loads before it copies anything, and a failed call leaves the model as
it was (``quantize.unchanged_on_error``). The names below are importable from here directly.
"""
from .checkpoint import load_quantized, read_quantized, save_quantized
from .merge import merge, merge_errors, merged_linear
from .ours import (adapter_config, adapter_shapes, adapter_tensors, base_model_id, load_adapter, lora_layers,
                   read_adapter, save_adapter)
from .peft_format import check_peft_config, export_peft, import_peft

__all__ = ["adapter_config", "adapter_shapes", "adapter_tensors", "base_model_id", "check_peft_config", "export_peft",
           "import_peft", "load_adapter", "load_quantized", "lora_layers", "merge", "merge_errors", "merged_linear",
           "read_adapter", "read_quantized", "save_adapter", "save_quantized"]
