"""`charter init`: lay out CHARTER_HOME. Idempotent: it fills in what is missing, never overwrites."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources

from charter.config import Home
from charter.fsutil import private_dir, write_private
from charter.identity.keys import SigningKey


@dataclass
class InitReport:
    home: str
    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    root_key_id: str = ""


def _default(name: str) -> bytes:
    return resources.files("charter.defaults").joinpath(name).read_bytes()


def init_home(home: Home) -> InitReport:
    report = InitReport(home=str(home.root))
    private_dir(home.root)

    def put(path, data: bytes, mode: int = 0o600) -> None:
        if path.exists():
            report.kept.append(str(path.relative_to(home.root)))
        else:
            write_private(path, data, mode=mode, exclusive=True)
            report.created.append(str(path.relative_to(home.root)))

    for d in (home.keys_dir, home.sandboxes_dir, home.run_dir, home.policies_dir, home.policies_dir / "tests"):
        existed = d.exists()
        private_dir(d)
        (report.kept if existed else report.created).append(str(d.relative_to(home.root)) + "/")

    put(home.config_path, _default("charter.toml"))
    put(home.policies_dir / "default.toml", _default("policies/default.toml"))
    put(home.policies_dir / "tests" / "default.toml", _default("policies/tests/default.toml"))

    if home.root_key_path.exists():
        report.kept.append(str(home.root_key_path.relative_to(home.root)))
        key = SigningKey.load_pem(home.root_key_path)
        if os.stat(home.root_key_path).st_mode & 0o077:
            os.chmod(home.root_key_path, 0o600)
    else:
        key = SigningKey.generate()
        key.save_pem(home.root_key_path)
        report.created.append(str(home.root_key_path.relative_to(home.root)))
    report.root_key_id = key.public.key_id

    from charter.budget.ledger import Ledger  # the schemas live with their owners
    from charter.budget.relocate import move_ledger
    from charter.bus.log.sqlite import SqliteLog
    from charter.identity.registry import Registry

    existed = home.db_path.exists()
    Registry(home.db_path).close()
    SqliteLog(home.db_path).close_sync()
    os.chmod(home.db_path, 0o600)
    (report.kept if existed else report.created).append(home.db_path.name)
    existed = home.budget_db_path.exists()
    move_ledger(home.db_path, home.budget_db_path)  # an older home's ledger, if charter.db still holds it
    Ledger(home.budget_db_path, background_checkpoints=False).close()
    os.chmod(home.budget_db_path, 0o600)
    (report.kept if existed else report.created).append(home.budget_db_path.name)
    return report
