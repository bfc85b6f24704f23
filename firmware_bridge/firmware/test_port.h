/* Port header for the host unit tests (test_fw.c): critical sections that count their nesting, and a
 * preemption hook through which the test injects a timer interrupt (fw_tick) wherever one could fire.
 * Build with -DFW_PORT_HEADER="\"test_port.h\"". -DFW_TEST_NO_CRITICAL leaves the critical sections
 * out: the negative control, in which the injector must find corrupted frames. */
#ifndef FW_TEST_PORT_H
#define FW_TEST_PORT_H

void fw_test_enter_critical(void);
void fw_test_exit_critical(void);
void fw_test_preempt(const void *fw);

#ifndef FW_TEST_NO_CRITICAL
#define FW_ENTER_CRITICAL() fw_test_enter_critical()
#define FW_EXIT_CRITICAL() fw_test_exit_critical()
#else
#define FW_ENTER_CRITICAL() ((void)0)
#define FW_EXIT_CRITICAL() ((void)0)
#endif
#define FW_PREEMPT_POINT(fw) fw_test_preempt(fw)

#endif
