"""A well-behaved plugin: it only uses what it is handed."""


def greet(name, decorate):
    # ``decorate`` is a function of the host application, handed to the
    # plugin: calling it runs it in the master, not here
    return decorate(f"hello, {name}, from inside the sandbox")


def count_words(text):
    return len(text.split())
