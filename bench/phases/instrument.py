# Per-phase timing of the CPU layer, for measurement only (bench/NOTES.md, h20g):
#   python3 bench/phases/instrument.py <a COPY of the source tree>
# inserts timers between the phases of layer_cpu.c's forward and backward
# (wall and process CPU time per phase) and, in driver.c, each thread's
# finish time of the grouped GEMM's item loop (the thread-ms spent waiting
# at its barrier). Build the copy's library and run layerprof against it:
# it prints the table at exit, per fwd+bwd, skipping the first fwd+bwd.
# The insertion points are found by the statements' text: after an edit of
# layer_cpu.c a missing one stops the script ("no <pattern>").
import re,sys
root=sys.argv[1]
p=root+'/src/backend/cpu/layer_cpu.c'
L=open(p).read().split('\n')
def before(pattern, text, back=0):
    for i,l in enumerate(L):
        if pattern in l:
            L.insert(i-back,text); return
    raise SystemExit('no '+pattern)
def after(pattern, text, nth=1):
    c=0
    for i,l in enumerate(L):
        if pattern in l:
            c+=1
            if c==nth:
                # find end of statement: line ending with ';' or '}' from i
                j=i
                while not (L[j].rstrip().endswith(';') or L[j].rstrip().endswith('}')):
                    j+=1
                L.insert(j+1,text); return
    raise SystemExit('no '+pattern)
after('MOE_TRY(moe_router_logits(x, a, T, logits));','PH(0,"f.router_gemm");')
after('moe_route_topk(logits, T, E, k','PH(1,"f.topk");')
after('x.offsets = offsets;','PH_START();',1)
after('slot_row, row_slot, (int64_t *)moe_at(ws, b.f_cursor));','PH(2,"f.sort");')
after('memset(sv + end, 0, b.saved_bytes - end);','PH(3,"f.memset_saved");')
after('moe_permute_rows(&args->hidden, row_slot, R, k, xp, H, NULL','PH(4,"f.permute");')
before('/* the expert epilogue (act.h)','PH(5,"f.gu_gemm");')
after('moe_act_fwd_rows(&ak, &tg, &tu, &ta, plan->nt);','PH(6,"f.act_fwd");')
after('memset(hp + used, 0, b.offsets - b.hpre - used);','PH(7,"f.memset_hp");')
after('s = moe_fwd_gemm(&x, 1, act, I, &args->w_down, y, dt, H);','PH(8,"f.down_gemm");')
after('moe_unpermute(y, dt, slot_row','PH(9,"f.unpermute");')
before('moe_permute_rows(&args->grad_output, row_slot','PH_START();')
after('moe_permute_rows(&args->grad_output, row_slot','PH(10,"b.permute_dO");')
after('s = moe_dx_gemm(&xb, 1, dor, ld, &a->w_down, dap, MOE_F32, I, 0.0f);','PH(11,"b.dA_gemm");')
after('moe_act_bwd_saved_rows(&ak, hr,','PH(12,"b.act_bwd");')
after('s = moe_dw_gemm(&x, 1, rows, ld, da, I, &args->grad_w_down);','PH(13,"b.dW_down");')
after('moe_permute_rows(&a->hidden, row_slot, R, k, rows, H, NULL','PH(14,"b.permute_x");')
before('/* dXp = dH . W_gate_up in the layer dtype','PH(15,"b.dW_gu");')
before('for (int64_t r = 0; r < R_here; r++)','PH(16,"b.dX_gu");',1)
after('memcpy(rows + (size_t)(r * ld + H) * es, &ds[r], sizeof(float));','PH(17,"b.ds_tail");')
after('sizeof(float));\n','',1) if False else None
after('memcpy(&dw[q], rows','}\n  } PH(18,"b.dw_gather"); {{')
after('s = moe_router_logits(&x, a, T, probs);','PH(19,"b.router_gemm");')
after('E, k, d->norm_topk_prob, dl, plan->nt);','PH(20,"b.probs_topk_bwd");')
after('s = moe_gemm_grouped(&pw, &x.ctx);','PH(21,"b.dWg_gemm");')
after('t0, tn, k, H, dx, x->p->nt);','PH(22,"b.gh_permute_bwd");')
after('MOE_TRY(moe_gemm_grouped(&px, &x->ctx));','PH(23,"b.gh_dl_gemm");')
after('dx[t * H + h]);','PH(24,"b.gh_store");')
src='\n'.join(L)
hdr='''#include <time.h>
extern double moe_ph_gemm_idle, moe_ph_gemm_wall; extern long moe_ph_gemm_calls;
static double ph_w[32], ph_c[32], ph_i[32], ph_gw[32]; static long ph_n[32], ph_gc[32]; static const char *ph_nm[32];
static double ph_lw, ph_lc; static long ph_calls;
static double ph_now(int clk){struct timespec t; clock_gettime(clk,&t); return t.tv_sec*1e3+t.tv_nsec*1e-6;}
static void PH_START(void){ph_lw=ph_now(CLOCK_MONOTONIC); ph_lc=ph_now(CLOCK_PROCESS_CPUTIME_ID); moe_ph_gemm_idle=0; moe_ph_gemm_wall=0; moe_ph_gemm_calls=0; ph_calls++;}
static void PH(int i,const char*n){double w=ph_now(CLOCK_MONOTONIC),c=ph_now(CLOCK_PROCESS_CPUTIME_ID); if(ph_calls>2){ph_w[i]+=w-ph_lw; ph_c[i]+=c-ph_lc; ph_i[i]+=moe_ph_gemm_idle; ph_gw[i]+=moe_ph_gemm_wall; ph_gc[i]+=moe_ph_gemm_calls; ph_n[i]++;} ph_nm[i]=n; moe_ph_gemm_idle=0; moe_ph_gemm_wall=0; moe_ph_gemm_calls=0; ph_lw=ph_now(CLOCK_MONOTONIC); ph_lc=ph_now(CLOCK_PROCESS_CPUTIME_ID);}
__attribute__((destructor)) static void ph_dump(void){ long reps=(ph_calls-2)/2; if(reps<=0) return; double tw=0,tc=0; fprintf(stderr,"phase                  wall_ms   cpu_ms  gemm_idle_ms(thread-ms at the gemm barrier) gemm_wall calls (per fwd+bwd, %ld reps)\\n",reps);
 for(int i=0;i<32;i++) if(ph_nm[i]){ fprintf(stderr,"%-20s %9.2f %9.2f %9.2f %9.2f %5.1f\\n",ph_nm[i],ph_w[i]/reps,ph_c[i]/reps,ph_i[i]/reps,ph_gw[i]/reps,(double)ph_gc[i]/reps); tw+=ph_w[i]; tc+=ph_c[i];}
 fprintf(stderr,"%-20s %9.2f %9.2f\\n","total",tw/reps,tc/reps);}
'''
src=src.replace('#include "plan/planner.h"\n','#include "plan/planner.h"\n'+hdr,1)
open(p,'w').write(src)
# driver: per-thread finish spread
d=root+'/src/backend/cpu/gemm/driver.c'
s=open(d).read()
s=s.replace('static int64_t moe_b_packed_count;','static int64_t moe_b_packed_count;\ndouble moe_ph_gemm_idle, moe_ph_gemm_wall; long moe_ph_gemm_calls;',1)
s=s.replace('#pragma omp parallel num_threads(run_nt)\n  {','double ph_fin[64]={0}; double ph_t0=omp_get_wtime();\n#pragma omp parallel num_threads(run_nt)\n  {',1)
s=s.replace('#pragma omp for schedule(dynamic, 1)\n    for (int64_t it = 0; it < total; it++) {','#pragma omp for schedule(dynamic, 1) nowait\n    for (int64_t it = 0; it < total; it++) {',1)
s=s.replace('    if (hooks && uk->bf16_end) uk->bf16_end();','    ph_fin[omp_get_thread_num()]=omp_get_wtime();\n    if (hooks && uk->bf16_end) uk->bf16_end();',1)
pat='  moe_free(owned);\n  return MOE_SUCCESS;\n}'; k=s.rfind(pat); s=s[:k]+s[k:].replace(pat,'  { double te=omp_get_wtime(); for(int i=0;i<run_nt;i++) moe_ph_gemm_idle+=(te-ph_fin[i])*1e3; moe_ph_gemm_idle+=(nt-run_nt)*(te-ph_t0)*1e3; moe_ph_gemm_wall+=(te-ph_t0)*1e3; moe_ph_gemm_calls++; }\n  moe_free(owned);\n  return MOE_SUCCESS;\n}',1)
assert s.count('ph_fin')==3, s.count('ph_fin')
open(d,'w').write(s)
