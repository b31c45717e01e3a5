"""What a firmware source file imports when it is imported (read from its syntax tree), for the
tests that keep the boot's import lists and the firmware's layout in step with the code."""
import ast


def import_time_imports(path):
    """Top-level names `path` imports when it is imported: not inside a function, nor under
    `if __name__ == "__main__"` (the board's main.py run, not an import)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = set()
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and getattr(node.test.left, "id", None) == "__name__"):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        todo.extend(ast.iter_child_nodes(node))
    return found


