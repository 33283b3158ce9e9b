from loratool.cli import run

run()
