"""The ``memformer-fast`` command-line application, built on the library and apart from it.

- :mod:`.cli`: flags, one-line errors and exit statuses;
- :mod:`.data`, :mod:`.settings`, :mod:`.training`, :mod:`.checkpoint`, :mod:`.evaluation`:
  byte-level language modelling with MRBP (the corpus and its streams; a run's settings; the
  trainer; checkpoints and their integrity checks; held-out bits per byte and streaming
  generation); :mod:`.signals`, :mod:`.disk`: stop signals and the output folder (checks, lock,
  files forced to disk); :mod:`.errors`: the errors the CLI prints on one line;
- :mod:`.recall`, :mod:`.demo`, :mod:`.plotting`: the recall task, the demo that trains on it,
  its learning curves;
- :mod:`.memory_probe`: the peak memory of one training step in a fresh process (also used by
  ``benchmarks/``).

Nothing in the library (``memformer_fast`` outside this folder) imports it. The library raises
errors that name its arguments; this application turns them into messages about flags.
"""
