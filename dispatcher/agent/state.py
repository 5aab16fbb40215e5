"""The agent's identity on disk: node_id and node_secret, readable by its owner only."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Identity:
    node_id: str | None = None
    node_secret: str | None = None


class StateFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> Identity:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return Identity()
        except (OSError, ValueError) as exc:
            raise SystemExit(f"cannot read agent state {self.path}: {exc}") from exc
        return Identity(data.get("node_id"), data.get("node_secret"))

    def save(self, identity: Identity) -> None:
        """Write atomically (temp file + rename) with mode 0600: the secret is a credential."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"node_id": identity.node_id, "node_secret": identity.node_secret}, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise

    def clear(self) -> None:
        self.save(Identity())
