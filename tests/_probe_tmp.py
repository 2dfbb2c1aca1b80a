import time, atexit, resource
import pytest
import gradual_jax.sampling as S
R = []
orig = S.Sampler._compile
N = {"n": 0}
def comp(self, name, fn, args, static, donate=()):
    b = self.stats.compiles; r = orig(self, name, fn, args, static, donate); N["n"] += self.stats.compiles - b; return r
S.Sampler._compile = comp
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    t = resource.getrusage(resource.RUSAGE_SELF); c0 = t.ru_utime + t.ru_stime; n0 = N["n"]
    yield
    t = resource.getrusage(resource.RUSAGE_SELF); R.append((round(t.ru_utime + t.ru_stime - c0, 1), N["n"] - n0, item.name))
atexit.register(lambda: [print("CPU", r) for r in sorted(R, reverse=True)[:12]])
