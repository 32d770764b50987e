"""Where the original cpy2py kept its twin classes; ``cpy2py.proxy.proxy_object``
still finds them, so code written for it imports unchanged."""
