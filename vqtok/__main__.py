"""`python -m vqtok`, which `accelerate launch -m vqtok` runs in every process."""

from vqtok.cli import main

main()
