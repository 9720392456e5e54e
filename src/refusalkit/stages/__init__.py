"""The stages of a run, one module each: a stage is a function with explicit inputs and outputs
(``candidates = extract(lm, splits, settings, layout)``) plus the description of what it depends on
(``inputs(...)``, fingerprinted by ``refusalkit.manifest.Manifest.stage``) and how to read its saved
result back (``load(layout)``). ``refusalkit.pipeline`` wires them together.

  data      the splits (data/splits.json), cached by the content of their sources
  extract   mean activations and candidate directions
  select    the paper's scoring and rules; the direction
  evaluate  completions and refusal rates per setting
  measure   judges, coherence, capability (evaluation/suite.py)
  export    the edited checkpoint
  results   the run's headline numbers (results.json) and the results table
"""

STAGES = ("extract", "select", "evaluate", "measure", "export")
