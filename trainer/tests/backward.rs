//! candle's backward as patched in `third_party/candle-core` (gradients written once): a
//! tensor's gradient summed over several contributions is exact; a gradient tensor shared
//! by two arguments is never added into in place, in either order; a first contribution
//! that is a strided view is stored contiguous.

use candle_core::{Device, Result, Tensor, Var};

fn var(values: &[f32]) -> Result<Var> {
    Var::from_slice(values, values.len(), &Device::Cpu)
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

fn constant(values: &[f32]) -> Result<Tensor> {
    Tensor::from_slice(values, values.len(), &Device::Cpu)
}

/// Small integers and halves: every partial sum is exact, whatever the order.
const A: [f32; 4] = [1.0, -2.0, 0.5, 3.0];
const B: [f32; 4] = [4.0, 0.25, -1.5, 2.0];

#[test]
fn several_contributions_sum_exactly() -> Result<()> {
    let x = var(&[0.3, -1.7, 2.2, 0.0])?;
    let (a, b) = (constant(&A)?, constant(&B)?);
    // d/dx: a (mul), b (mul), -1 (sub), 2 (x + x), -a (x * a subtracted through neg).
    let loss = ((x.as_tensor() * &a)?.sum_all()? + (x.as_tensor() * &b)?.sum_all()?)?;
    let loss = (loss - x.as_tensor().sum_all()?)?;
    let loss = (loss + (x.as_tensor() + x.as_tensor())?.sum_all()?)?;
    let loss = (loss + (x.as_tensor() * &a)?.neg()?.sum_all()?)?;
    let grads = loss.backward()?;
    let got = values(grads.get(&x).expect("x has a gradient"))?;
    let want: Vec<f32> = A
        .iter()
        .zip(B)
        .map(|(a, b)| a + b - 1.0 + 2.0 - a)
        .collect();
    assert_eq!(got, want);
    Ok(())
}

/// `u + v` hands both the same gradient tensor; `u` then gets a second contribution. Its
/// sum must be a new tensor or an add into storage of its own, never into the shared one.
#[test]
fn a_shared_gradient_is_not_added_into() -> Result<()> {
    for shared_first in [true, false] {
        let (u, v) = (var(&[1.0, 2.0, 3.0, 4.0])?, var(&[-1.0, 0.5, 2.0, 8.0])?);
        let (c, d) = (constant(&A)?, constant(&B)?);
        let through_sum = ((u.as_tensor() + v.as_tensor())? * &c)?.sum_all()?;
        let through_u = (u.as_tensor() * &d)?.sum_all()?;
        let loss = if shared_first {
            (through_sum + through_u)?
        } else {
            (through_u + through_sum)?
        };
        let grads = loss.backward()?;
        let gu = values(grads.get(&u).expect("u has a gradient"))?;
        let gv = values(grads.get(&v).expect("v has a gradient"))?;
        let want_u: Vec<f32> = A.iter().zip(B).map(|(c, d)| c + d).collect();
        assert_eq!(gu, want_u, "shared first: {shared_first}");
        assert_eq!(gv, A.to_vec(), "shared first: {shared_first}");
    }
    Ok(())
}

/// A transposed or broadcast first contribution is stored as a contiguous tensor of the
/// argument's shape, as the zeros-and-add it replaces gave it.
#[test]
fn strided_first_contributions_are_stored_contiguous() -> Result<()> {
    let x = Var::from_slice(&[1f32, 2.0, 3.0, 4.0, 5.0, 6.0], (2, 3), &Device::Cpu)?;
    let c = Tensor::from_slice(&[1f32, 10.0, 100.0, 1000.0, 1e4, 1e5], (3, 2), &Device::Cpu)?;
    let loss = (x.as_tensor().t()? * &c)?.sum_all()?;
    let grads = loss.backward()?;
    let g = grads.get(&x).expect("x has a gradient");
    assert!(g.is_contiguous());
    assert_eq!(g.dims(), &[2, 3]);
    assert_eq!(values(g)?, vec![1.0, 100.0, 1e4, 10.0, 1000.0, 1e5]);

    let b = Var::from_slice(&[1f32, 2.0, 3.0], 3, &Device::Cpu)?;
    let loss = b.as_tensor().broadcast_as((4, 3))?.sum_all()?;
    let grads = loss.backward()?;
    let g = grads.get(&b).expect("b has a gradient");
    assert!(g.is_contiguous());
    assert_eq!(values(g)?, vec![4.0, 4.0, 4.0]);
    Ok(())
}
