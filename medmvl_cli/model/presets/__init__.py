"""Built-in presets: tiny random-init models and the small tokenizers that ship inside the package.

- ``tokenizers/<family>/``: one byte-level BPE tokenizer per LLM family (``qwen2``, ``llama3``,
  ``phi``, ``phi3``), saved with ``save_pretrained`` and loadable offline with
  ``AutoTokenizer.from_pretrained``. Find a folder with
  :func:`medmvl_cli.model.presets.tokenizer_files.preset_tokenizer_dir`.
- ``corpus.txt``: the medical text those tokenizers were trained on.
- ``tools/make_tokenizers.py``: regenerates the folders
  (``python tools/make_tokenizers.py``).
"""
