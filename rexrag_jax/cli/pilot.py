"""`rexrag-pilot --config configs/embedded.py --workdir DIR [--config.key=value ...]`: the dead-end pilot.

The embedded default's warm start, then one REX-RAG sampling pass (G per training question, probes after
wrong answers) with no training: the dead-end and rescue rates that place a level of the dead-end study.
Same flags and workdir layout as `rexrag-demo`, so a pilot's warm start is reused by a demo in that workdir.
"""

from rexrag_jax.cli.demo import pilot_cli

if __name__ == "__main__":
    pilot_cli()
