"""The edit search (`refusalkit optimize`, docs/search.md): parameterized rank-1 weight edits
(``edit``), their space (``space``), cheap objectives (``objectives``), the resumable Optuna study
(``study``), held-out verification (``verify``), the front and its choice (``front``), the command
(``optimize``, ``cli``) and the report section (``report``). Optuna is the `search` extra."""
