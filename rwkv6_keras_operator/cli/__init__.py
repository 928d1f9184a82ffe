"""Command line: python -m rwkv6_keras_operator {check,...} [--help]."""
import argparse
import importlib

# command name -> module exposing DESCRIPTION, add_arguments(parser) and run(args) -> exit code
COMMANDS = {
    "check": "rwkv6_keras_operator.cli.check",
    "demo": "rwkv6_keras_operator.cli.demo",
    "bench": "rwkv6_keras_operator.cli.bench",
    "generate": "rwkv6_keras_operator.cli.generate",
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m rwkv6_keras_operator",
                                     description="The RWKV6 WKV operator for Keras 3.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=module.DESCRIPTION, description=module.DESCRIPTION))
    args = parser.parse_args(argv)
    return modules[args.command].run(args)
