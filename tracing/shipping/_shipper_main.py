"""``python -m tracing.shipping._shipper_main``: the shipping process (see ``_shipproc``).

A module of its own, imported by nothing, so ``-m`` does not run a module the package has
already imported.
"""

from tracing.shipping._shipproc import main

if __name__ == "__main__":
    main()
