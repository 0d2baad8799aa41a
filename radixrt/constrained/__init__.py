"""Structured generation: grammars (regex, JSON schema, EBNF) compiled once per text and
tokenizer (``grammar``), a per-sequence matcher (``matcher``), the batch's token bitmask filled
on the CPU (``batch``) and applied to the logits on the device in one pass (``bitmask``).

Built on xgrammar: on the default model's tokenizer it fills a JSON-schema mask in ~9 us per
token against llguidance's ~79 us (bench/RESULTS.md, "Structured generation").
"""
