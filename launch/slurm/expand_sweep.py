"""Print one line per combination of a Hydra sweep, each a shell-quoted list of plain overrides:
`extractor.k=2,4 learner.grad_accum=1,2 rounds=1` gives 4 lines. Hydra's own parser reads the
sweep syntax (a,b / range() / choice()), so the combinations are the ones `-m` would run."""

import itertools
import shlex
import sys

from hydra.core.override_parser.overrides_parser import OverridesParser


def combinations(args: list[str]) -> list[list[str]]:
    choices = []
    for override in OverridesParser.create().parse_overrides(args):
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(combo) for combo in itertools.product(*choices)]


if __name__ == "__main__":
    for combo in combinations(sys.argv[1:]):
        print(shlex.join(combo))
