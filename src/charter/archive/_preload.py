"""What the archivist's fork server imports before it forks a child (`children.PRELOAD`).

The CLI too, for a daemon run as the `charter` console script: each child runs that script again
(as `__mp_main__`), and the script imports the CLI. Guarded: the fork server survives only an
ImportError in what it preloads, and a CLI that fails to import (no home directory to resolve,
say) must cost the children that import, not every job.
"""

import charter.archive.archivist  # noqa: F401

try:
    import charter.cli.main  # noqa: F401
except Exception:  # noqa: BLE001 - see above; the child imports it itself, as it did before
    pass
