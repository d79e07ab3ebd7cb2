"""`ranklens reproduce`: the experiments of the dimensional-collapse paper as one resumable pipeline and one report."""
