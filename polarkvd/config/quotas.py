"""The `[quotas]` section: how much DRAM and disk each tenant (a cache_salt) may hold.

Only the options and how the tenants table is parsed; enforcement is `polarkvd/manager/quotas.py`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from polarkvd.config.options import Knob, OptionProblems
from polarkvd.config.options import option as _opt
from polarkvd.config.values import parse_size

#: what a tenant's table may hold (quotas.tenants)
TENANT_KEYS = ("name", "dram", "disk")
_TENANT_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def parse_tenant_quotas(value: object) -> dict[str, dict[str, Any]]:
    """quotas.tenants: {cache_salt: {"name": label, "dram": size, "disk": size}}, every key optional;
    from TOML a table, from the environment, --set or `polarkvd tune` the same as JSON text.
    Every problem is reported (OptionProblems), keyed below the option."""
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            raise ValueError(
                'expected a table like {"<cache_salt>": {"dram": "1GiB", "disk": "4GiB"}} (JSON text)'
            ) from None
    if not isinstance(value, dict):
        raise ValueError('expected a table of cache_salt -> {dram = "1GiB", disk = "4GiB", name = "acme"}')
    out: dict[str, dict[str, Any]] = {}
    problems: list[tuple[str, object, str]] = []
    names: dict[str, str] = {}
    for salt, table in value.items():
        if not isinstance(salt, str) or len(salt) > 1024:
            problems.append(
                (str(salt)[:64], salt, "a tenant is a cache_salt: a string of at most 1024 characters")
            )
            continue
        if not isinstance(table, dict):
            problems.append((salt, table, 'expected a table like {dram = "1GiB", disk = "4GiB"}'))
            continue
        entry: dict[str, Any] = {}
        for key, v in table.items():
            if key not in TENANT_KEYS:
                problems.append((f"{salt}.{key}", v, f"unknown key; known: {', '.join(TENANT_KEYS)}"))
            elif key == "name":
                if not isinstance(v, str) or not _TENANT_NAME_RE.match(v):
                    problems.append((f"{salt}.name", v, "expected 1-64 letters, digits or _ . : -"))
                elif v in names:
                    problems.append((f"{salt}.name", v, f"also the name of tenant {names[v]!r}"))
                else:
                    names[v] = salt
                    entry["name"] = v
            else:
                try:
                    entry[key] = parse_size(v)
                except ValueError as e:
                    problems.append((f"{salt}.{key}", v, str(e)))
        out[salt] = entry
    if problems:
        raise OptionProblems(problems)
    return out


@dataclasses.dataclass
class QuotasConfig:
    default_dram: int = _opt(
        0,
        parse_size,
        "DRAM a tenant (a cache_salt) not listed in tenants may hold; 0 = unlimited",
        live=Knob("default DRAM quota", "per tenant not listed; 0 = unlimited"),
    )
    default_disk: int = _opt(
        0,
        parse_size,
        "disk a tenant not listed in tenants may hold; 0 = unlimited",
        live=Knob("default disk quota", "per tenant not listed; 0 = unlimited"),
    )
    tenants: dict[str, dict[str, Any]] = _opt(
        {},
        parse_tenant_quotas,
        "per cache_salt: {dram, disk, name}; a size left out is the default, 0 = unlimited",
        live=Knob("tenants", 'JSON: {"salt": {"dram": "1GiB", "disk": "4GiB", "name": "acme"}}'),
    )
