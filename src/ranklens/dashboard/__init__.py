"""The feature dashboard: a static site that shows what a sparse dictionary (SAE or Lorsa) learned.

- ``site_writer``: ``write_site`` writes the site directory (static assets plus data files that load under
  ``file://``), ``write_compare`` the comparison page of two runs. The data contract is in ``docs/dashboard.md``.
- ``server``: ``make_app``/``serve``, a local server for a written site that adds the prompt box (``api/prompt``).
"""

from ranklens.dashboard.site_writer import FORMAT, write_compare, write_site

__all__ = ["FORMAT", "write_compare", "write_site"]
