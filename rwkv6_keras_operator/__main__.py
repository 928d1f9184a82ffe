import sys

from rwkv6_keras_operator.cli import main

sys.exit(main())
