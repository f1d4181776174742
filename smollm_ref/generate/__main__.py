"""`python -m smollm_ref.generate` runs this. The command lives here rather than at the foot of the package's
`__init__`: `import smollm_ref` has imported that already (it exports `generate`), and running an imported
module a second time as `__main__` is what Python warns about ("found in sys.modules after import")."""

import sys

from . import main

sys.exit(main())
