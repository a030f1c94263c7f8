"""`flynn`: the operator command line (one argparse tree of command groups)."""
