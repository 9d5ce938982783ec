"""The test suite (a regular package, so that the plugin `tests.plugins.remote` resolves here and not to a `tests`
package that some wheels, e.g. torch-fidelity 0.4.0, install into site-packages)."""
