"""One module per experiment of issue 6: `step(plan)` (what to run), `verdicts(result, alpha)` (the claims, computed
from the step's numbers) and `section(rep, record, verdicts, fig_dir)` (its part of the report)."""
