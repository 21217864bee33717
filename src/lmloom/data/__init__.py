"""The data stage family: sources -> cleaning steps -> train/val split, as one `corpus` artifact.

documents.py       Document, Reject, JsonlWriter
stdlib_corpus.py   the built-in `python-stdlib` source (code + docs, read with ast, never imported)
sources.py         source configs (a discriminated union on `type`) and their readers
provenance.py      every file read, hashed while reading (sources.jsonl), and source pins
steps.py           cleaning steps: one generator each, with StepStats and a reason per removal
split.py           the content-hash train/validation split
stage.py           `data.prepare`: PrepareConfig, run, summary
"""
