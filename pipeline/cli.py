def main():
    from titans.models import deferral
    print("ok", deferral)
