"""moto's server with one change: secrets are found by name in O(1).

moto 5.2.5's `SecretsStore` finds a secret by scanning every secret it holds on each lookup (to
accept an ARN as well as a name), so a BatchGetSecretValue of 20 secrets among 10,000 costs 400,000
comparisons: in the 10,000-identity cold start (BENCHMARKS.md, W1) that scan was 60 % of moto's CPU,
on the same two cores as the operator and the control plane. Real Secrets Manager's lookups do not
run on this machine, so the scan measured the fake, not the operator.

The store is keyed by name and a name has no ':' (AWS allows letters, digits and /_+=.@-), while
every ARN has; so a key without ':' that is in the store under itself names that secret, exactly
as the scan would find it. Every other key (ARNs, partial ARNs, absent names) takes moto's own
path unchanged. Started by `cargo xtask testenv` with the virtualenv's Python:
`python3 xtask/moto_server.py -H 127.0.0.1 -p PORT`.
"""

import sys

from moto.secretsmanager import models
from moto.server import main

_scan_getitem = models.SecretsStore.__getitem__
_scan_contains = models.SecretsStore.__contains__
_scan_get = models.SecretsStore.get


def _by_name(store, key):
    if isinstance(key, str) and ":" not in key:
        secret = dict.get(store, key)
        if secret is not None and secret.name == key:
            return secret
    return None


def _getitem(self, key):
    secret = _by_name(self, key)
    return secret if secret is not None else _scan_getitem(self, key)


def _contains(self, key):
    return _by_name(self, key) is not None or _scan_contains(self, key)


def _get(self, key):
    secret = _by_name(self, key)
    return secret if secret is not None else _scan_get(self, key)


models.SecretsStore.__getitem__ = _getitem
models.SecretsStore.__contains__ = _contains
models.SecretsStore.get = _get

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
