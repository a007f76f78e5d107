"""Train a model: `python train.py [group=option ...] [key=value ...]`; see configs/train.yaml."""

from zoo.cli import train_main

if __name__ == "__main__":
    train_main()
