"""Run under torchrun by tests: train a tokenizer as `dove-vlm train-tokenizer --config` does, then write this
process's final parameters (tokenizer and discriminator) to DUMP_DIR/rank{r}.safetensors, so that a test can
check that every DDP process ended with the same weights.

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_dump_params.py CONFIG DATA ANNOTATIONS OUTPUT DUMP_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from safetensors.torch import save_file

from tokenizer.training.config import load_training_file
from tokenizer.training.loop import TokenizerTrainer


def main(config: str, data: str, annotations: str, output: str, dump_dir: str) -> None:
    trainer = TokenizerTrainer(
        load_training_file(config), data=data, output_dir=output, annotations=annotations, progress=False
    )
    trainer.train()
    tensors = {f"model.{k}": v for k, v in trainer.tokenizer.state_dict().items()}
    discriminator = trainer.accelerator.unwrap_model(trainer.disc_model)
    tensors.update({f"disc.{k}": v for k, v in discriminator.state_dict().items()})
    Path(dump_dir).mkdir(parents=True, exist_ok=True)
    path = Path(dump_dir) / f"rank{trainer.accelerator.process_index}.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


if __name__ == "__main__":
    main(*sys.argv[1:])
