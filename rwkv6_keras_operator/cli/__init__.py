"""Command line: `rwkv6-keras-operator COMMAND` (the console script) or `python -m rwkv6_keras_operator COMMAND`."""
import argparse
import importlib
import os
import sys

from .. import __version__

# command name -> module exposing DESCRIPTION, add_arguments(parser) and run(args) -> exit code
COMMANDS = {
    "check": "rwkv6_keras_operator.cli.check",
    "demo": "rwkv6_keras_operator.cli.demo",
    "bench": "rwkv6_keras_operator.cli.bench",
    "generate": "rwkv6_keras_operator.cli.generate",
}


def main(argv=None):
    console_script = os.path.splitext(os.path.basename(sys.argv[0]))[0] == "rwkv6-keras-operator"
    prog = "rwkv6-keras-operator" if console_script else "python -m rwkv6_keras_operator"
    parser = argparse.ArgumentParser(prog=prog, description="The RWKV6 WKV operator for Keras 3.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=module.DESCRIPTION, description=module.DESCRIPTION))
    args = parser.parse_args(argv)
    return modules[args.command].run(args)
