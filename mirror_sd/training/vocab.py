"""(being written this session)"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target")


def main(args: argparse.Namespace) -> int:
    raise NotImplementedError("being written")
