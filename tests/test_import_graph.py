"""No two modules of the package import each other, directly or through others.

`lint-imports` (.importlinter) keeps the packages layered; inside one package it sees nothing, so
a circle such as function_tokens <-> sources could come back unnoticed. This walks the same import
graph (grimp, import-linter's own) module by module, lazy imports included."""

import grimp


def test_no_module_imports_itself_through_another():
    graph = grimp.build_graph("esm3_jax")
    circles = sorted({
        tuple(sorted((a, b)))
        for a in graph.modules
        for b in graph.find_modules_directly_imported_by(a)
        if b.startswith("esm3_jax") and graph.chain_exists(importer=b, imported=a)
    })
    assert not circles, "import circles: " + "; ".join(f"{a} <-> {b}" for a, b in circles)
