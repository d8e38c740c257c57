"""Write one run config per method at a matched parameter budget, from a recipe config and `moelora budget`.

    python scripts/make_compare_configs.py --shapes yahma/llama-7b-hf --recipe configs/d2mora_llama_7b_m3n8r8.yaml \
        --params 35.8M --out configs/compare/llama7b_35.8M

Each file is the recipe with `method` and `adapter` replaced: the rank the budget allows (structure: the
method's defaults), lora_alpha = 2r (the D2MoRA table's convention) and the recipe's targets and dropout.
`--shapes` is any model id or folder with the same architecture (only its config is read).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from moelora.budget import budget_table, parse_count, structure
from moelora.training import build_adapter_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", required=True, help="model id or folder whose config gives the shapes")
    parser.add_argument("--recipe", required=True, type=Path, help="run config to copy the training settings from")
    parser.add_argument("--params", required=True, help="budget, e.g. 35.8M")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()

    recipe = yaml.safe_load(args.recipe.read_text())
    targets = recipe["adapter"]["target_modules"]
    budget = parse_count(args.params)
    args.out.mkdir(parents=True, exist_ok=True)
    for row in budget_table(args.shapes, budget, targets):
        if not row.trainable_parameters:
            print(f"{row.method}: over budget at r=1, skipped")
            continue
        adapter = {**structure(row.method, row.settings), "lora_alpha": 2 * row.settings["r"]}
        adapter = {k: v for k, v in adapter.items() if v is not None}
        adapter.update(lora_dropout=recipe["adapter"].get("lora_dropout", 0.05), target_modules=targets)
        try:
            build_adapter_config(row.method, dict(adapter))
        except ValueError as error:  # a method without adapter dropout (MoA) trains without it
            if "lora_dropout" not in str(error):
                raise
            adapter["lora_dropout"] = 0.0
        config = {
            **recipe,
            "method": row.method,
            "adapter": adapter,
            "training": {**recipe["training"], "output_dir": f"runs/{args.out.name}/{row.method}"},
        }
        header = (
            f"# {row.method} at a {args.params} budget: {row.trainable_parameters:,} trainable parameters on "
            f"{recipe['model']} {targets} (written by scripts/make_compare_configs.py from {args.recipe}).\n"
        )
        (args.out / f"{row.method}.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False))
        print(f"{row.method}: r={row.settings['r']}, {row.trainable_parameters:,} parameters")


if __name__ == "__main__":
    main()
