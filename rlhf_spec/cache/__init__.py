"""The content-addressed cache: file primitives (:mod:`.fs`), the entry store (:mod:`.store`), leases
(:mod:`.lease`), resumable shards (:mod:`.shards`), cache keys (:mod:`.keys`) and gc (:mod:`.gc`)."""

from ..files import atomic_write_json, fsync_dir, oserror_text  # noqa: F401
from .lease import HEARTBEAT, LEASE_TTL, Lease  # noqa: F401
from .store import KEY_FORMAT, MANIFEST, Cache  # noqa: F401
