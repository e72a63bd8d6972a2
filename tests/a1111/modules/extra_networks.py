"""Mirrors modules/extra_networks.py (v1.10.1): ``<name:args>`` prompt tags and network activation."""

from __future__ import annotations

import re
from collections import defaultdict

from modules import errors

re_extra_net = re.compile(r"<(\w+):([^>]+)>")
extra_network_registry: dict = {}


class ExtraNetworkParams:
    """Mirrors extra_networks.ExtraNetworkParams (v1.10.1)."""

    def __init__(self, items=None):
        self.items = items or []
        self.positional, self.named = [], {}
        for item in self.items:
            parts = item.split("=", 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)

    def __eq__(self, other):
        return self.items == other.items


class ExtraNetwork:
    """Mirrors extra_networks.ExtraNetwork (v1.10.1)."""

    def __init__(self, name):
        self.name = name

    def activate(self, p, params_list):
        raise NotImplementedError

    def deactivate(self, p):
        raise NotImplementedError


def register_extra_network(extra_network) -> None:
    """Mirrors extra_networks.register_extra_network (v1.10.1)."""
    extra_network_registry[extra_network.name] = extra_network


def lookup_extra_networks(extra_network_data) -> dict:
    """Mirrors extra_networks.lookup_extra_networks (v1.10.1): unknown names are skipped."""
    return {extra_network_registry[name]: args for name, args in (extra_network_data or {}).items() if name in extra_network_registry}


def activate(p, extra_network_data) -> None:
    """Mirrors extra_networks.activate (v1.10.1): named networks, the rest with [], then the script hook."""
    activated = []
    for network, args in lookup_extra_networks(extra_network_data).items():
        try:
            network.activate(p, args)
            activated.append(network)
        except Exception as e:
            errors.display(e, f"activating extra network {network.name} with arguments {args}")
    for name, network in extra_network_registry.items():
        if network not in activated:
            try:
                network.activate(p, [])
            except Exception as e:
                errors.display(e, f"activating extra network {name}")
    if p.scripts is not None:
        p.scripts.after_extra_networks_activate(
            p, batch_number=p.iteration, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds, extra_network_data=extra_network_data
        )


def deactivate(p, extra_network_data) -> None:
    """Mirrors extra_networks.deactivate (v1.10.1)."""
    data = lookup_extra_networks(extra_network_data)
    for network in [*data, *[n for n in extra_network_registry.values() if n not in data]]:
        try:
            network.deactivate(p)
        except Exception as e:
            errors.display(e, f"deactivating extra network {network.name}")


def parse_prompt(prompt: str):
    """Mirrors extra_networks.parse_prompt (v1.10.1): strip the tags, collect their params by name."""
    res = defaultdict(list)

    def found(m):
        res[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""

    return re.sub(re_extra_net, found, prompt), res


def parse_prompts(prompts):
    """Mirrors extra_networks.parse_prompts (v1.10.1): cleaned prompts and the first prompt's data."""
    res, extra_data = [], None
    for prompt in prompts:
        updated, parsed = parse_prompt(prompt)
        extra_data = parsed if extra_data is None else extra_data
        res.append(updated)
    return res, extra_data
