/* hello_static: built with -static; the shim cannot reach it (mig must say so). */
#include <stdio.h>
int main(void) {
    puts("hello from a static program");
    return 0;
}
