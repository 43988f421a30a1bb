"""Key converters, config inference and file identification for the model files users actually have.

One module per model family, each pure functions over key names and shapes, so they can be tested without
building a model:

* :mod:`.source` - lazy access to a weights file or folder (names, shapes, dtypes before any tensor is read);
* :mod:`.quant` - ComfyUI's fp8 formats (old ``scaled_fp8`` + ``scale_weight``, newer ``comfy_quant`` +
  ``weight_scale``) turned back into plain tensors;
* :mod:`.wan_transformer`, :mod:`.wan_vae`, :mod:`.umt5`, :mod:`.wav2vec2` - layouts, renames, config inference;
* :mod:`.spm` - a tokenizer from the SentencePiece model bytes that ComfyUI's umT5 files carry;
* :mod:`.identify` - what a file looks like, in words a user understands.

The public entry points live in :mod:`actavatar_core.loading`. Nothing here imports ComfyUI.
"""
