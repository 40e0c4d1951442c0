"""The README's example runs as written, and its two set-up commands are the ones CI uses."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_example_trains():
    code = re.search(r"## Example.*?```python\n(.*?)```", README, re.S).group(1)
    assert len(code.strip().splitlines()) <= 25
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    params, opt_state = namespace["params"], namespace["opt_state"]
    x = jax.random.normal(jax.random.PRNGKey(0), (32, 784))
    y = jnp.arange(32) % 10
    losses = []
    for _ in range(60):
        params, opt_state, loss = namespace["train_step"](params, opt_state, x, y)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()
    assert any("python -m optax_ext.train" in c for c in commands)
